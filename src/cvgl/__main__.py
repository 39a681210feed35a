from cvgl.cli import main

raise SystemExit(main())
