"""The activation service: destinations, activation plans, deliveries."""
