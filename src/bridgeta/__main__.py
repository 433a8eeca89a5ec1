import sys

from bridgeta.cli import main

sys.exit(main())
