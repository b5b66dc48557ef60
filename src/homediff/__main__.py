import sys

from homediff.cli import main

sys.exit(main())
