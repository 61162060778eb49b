"""seedswarm.sampling"""
