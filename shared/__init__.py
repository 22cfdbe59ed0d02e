"""The app's own package: all logic of the Cancel Machine Action function app lives here.

Nothing here imports azure.functions; the function folders translate triggers to and from it.
"""
