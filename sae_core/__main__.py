from sae_core.cli import main

raise SystemExit(main())
