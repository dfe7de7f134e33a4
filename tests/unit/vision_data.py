"""Images for the vision tests: the family's own demo data (wheels only, no downloads)."""

from fmplex.families.vision.demo_data import PHOTOS, digit_images, encode, photos, write_digits_folder

__all__ = ["PHOTOS", "digit_images", "encode", "photos", "write_digits_folder"]
