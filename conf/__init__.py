"""The app's config files (``pkg://sparsecomm.conf``); importing this package stores their schema
(:mod:`sparsecomm.app.schema`) in Hydra's ConfigStore, so any composition finds it."""
from sparsecomm.app import schema  # noqa: F401  registers schema/<group>/<option>
