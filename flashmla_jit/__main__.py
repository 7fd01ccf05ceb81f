from flashmla_jit.cli import main

raise SystemExit(main())
