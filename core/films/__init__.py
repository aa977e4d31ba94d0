"""Reading films: PNG, JPEG and DICOM bytes to 8-bit grayscale, the DICOM header and guard, shared refusals.

Nothing here touches the database.
"""
