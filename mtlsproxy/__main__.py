from mtlsproxy.cli import main

raise SystemExit(main())
