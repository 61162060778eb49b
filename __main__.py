from seedswarm.cli import main

raise SystemExit(main())
