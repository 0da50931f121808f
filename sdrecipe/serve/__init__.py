"""`sdrecipe serve`: a local web view of a folder of recipes.

workspace (the folder's snapshot and what may be read) → details (the panels'
data) and builds (one `sdrecipe build` process at a time, its events relayed)
→ app (pages, partials, JSON API, event stream) behind security.Guard.
"""
