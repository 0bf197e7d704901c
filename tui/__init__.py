"""vftrace's Textual dashboard (``vftrace live`` / ``vftrace replay``)."""
