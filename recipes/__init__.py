"""Recipe drivers (one readable loop per recipe kind: setup -> loop -> cleanup) and their YAMLs.

The YAML files beside this module are validated by `cycle_oracle.config` before any actor starts.
"""
