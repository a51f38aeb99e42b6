"""One module per revision, oldest first (``lipia db history``)."""
