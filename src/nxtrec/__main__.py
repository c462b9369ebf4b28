import sys

from nxtrec.cli.main import main

sys.exit(main())
