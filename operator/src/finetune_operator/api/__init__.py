"""The API: the FineTuneJob and FineTuneSweep resources (pydantic models the CRDs are generated from)."""
