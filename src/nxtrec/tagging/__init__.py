"""`nxtrec tag`: tag a whole collection of images, resumably (see README: Tag a collection)."""
