import sys

from cleanbackdoor.cli import main

sys.exit(main())
