"""Settings and what they name: clouds, tenants, callers. The bottom layer above errors: it imports
nothing of the app but shared.errors and shared.formats."""
