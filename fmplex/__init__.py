"""fmplex: many tasks served on one shared foundation-model host."""
