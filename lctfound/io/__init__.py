"""CT volume I/O (SimpleITK) and the offline sample data."""
