"""Making WebDataset shards (img2dataset's layout) from a folder, a table of paths or the
photos scikit-image ships (`writer`, `photos`)."""
