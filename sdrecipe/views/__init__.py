"""Views of recipes and models for people: pictures, diffs, lineage."""
