from spa3d.cli.main import main

raise SystemExit(main())
