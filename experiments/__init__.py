"""One-off measurements: each folder holds a script, the JSON it produced and a README (run them from the repository root with `python -m experiments.<name>.<script>`)."""
