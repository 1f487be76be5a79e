"""Data: offline and hub datasets, image styles, federated partitions, image processing and
the on-disk cache of frozen image features.
"""
