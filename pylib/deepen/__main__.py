from deepen.cli import main

raise SystemExit(main())
