try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while Python is still importing porter: the same one line as later on
    import os
    import sys

    print("porter: interrupted", file=sys.stderr)
    os._exit(130)

raise SystemExit(main())
