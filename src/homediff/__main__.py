import sys

from homediff.app.cli import main

sys.exit(main())
