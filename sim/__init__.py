"""seedswarm.sim"""
