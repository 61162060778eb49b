from seedswarm.node.cli import main

raise SystemExit(main())
