"""The embedded default: SmolLM2-135M on packaged health text (launch/quickstart.sh)."""
