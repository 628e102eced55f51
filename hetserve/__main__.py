from hetserve.cli import main

raise SystemExit(main())
