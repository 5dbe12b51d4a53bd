import sys

from baffle.cli import main

sys.exit(main())
