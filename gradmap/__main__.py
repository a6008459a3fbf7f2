import sys

from gradmap.cli.app import main

sys.exit(main())
