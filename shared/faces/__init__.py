"""The app's faces: HTTP and queue in, typed messages and replies out. They parse, call the cancel
service or bulk, and shape the answer; the function folders call nothing else."""
