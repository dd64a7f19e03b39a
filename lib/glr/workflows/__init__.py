"""What a user runs end to end (cv, experiment, demo), built only from the layers below.
"""
