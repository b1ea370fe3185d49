import sys

from mailguard.cli import main

sys.exit(main())
