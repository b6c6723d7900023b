"""The reconstruction audit: a seeded sample of a corpus (`sample`) re-rendered (`stages`) and
scored (`scoring`) per slice (`pipeline`), then summarised (`summary`, `finish`) into tables and
an HTML report (`report`, `html`, `svg`); nightly indexes and thresholds (`index`); learned
metrics from local weights (`perceptual`); corpus statistics without reconstruction (`stats`).
`plan` holds what the pipeline and the report share."""
