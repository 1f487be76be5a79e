"""What users run: the ``dpfpl`` command line, sweeps, prediction with an exported prompt
and the prompt-as-a-service endpoint, and the log routing they share.
"""
