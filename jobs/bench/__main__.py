"""`python -m jobs.bench`: the same as `clinicalbert bench`."""

from . import main

if __name__ == "__main__":
    raise SystemExit(main())
