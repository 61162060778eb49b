"""seedswarm.bench"""
