"""What a ``.mar`` holds, read safely: the verified manifest and the archive's safety checks."""
