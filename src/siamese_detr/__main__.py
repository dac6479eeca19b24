import sys

from siamese_detr.cli.main import main

sys.exit(main())
