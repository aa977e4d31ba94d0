"""The model: network, bundle, preprocessing, scoring, calibration, Grad-CAM, precision and the OOD guard.

Nothing here touches the database; callers pass films and settings values in and get numbers back.
"""
