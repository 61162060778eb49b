"""seedswarm.node"""
