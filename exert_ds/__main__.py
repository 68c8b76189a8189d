from exert_ds.cli import main

raise SystemExit(main())
