"""Entry points named like other toolkits', for users migrating (Huawei AMCT)."""
