"""Ray Data pipelines that turn raw inputs into training-ready Parquet shards."""
