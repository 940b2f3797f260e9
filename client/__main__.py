from pipeq._cli import main

raise SystemExit(main())
