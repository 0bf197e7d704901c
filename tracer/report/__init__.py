"""Reports and exports of captures: ``vftrace report`` and ``vftrace export``."""
