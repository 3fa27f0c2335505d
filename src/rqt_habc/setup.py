from setuptools import find_packages, setup

package_name = 'rqt_habc'

setup(
    name=package_name,
    version='0.1.0',
    packages=find_packages(exclude=['test']),
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + package_name]),
        ('share/' + package_name, ['package.xml', 'plugin.xml']),
    ],
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='habc developers',
    maintainer_email='habc@example.org',
    description='The habc labelling dashboard (rqt plugin and standalone).',
    license='Apache-2.0',
    entry_points={'console_scripts': ['dashboard = rqt_habc.standalone:main']},
)
